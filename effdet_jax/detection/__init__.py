"""Detection core: anchors, box coding, target assignment, losses, NMS."""
