"""COCO evaluation: `coco.COCOEvaluator` (host metrics) and `runner`
(`Evaluator`, `make_evaluate_fn`, `evaluate_checkpoint`)."""
