//! Training: anchors, losses, optimizer and schedule, checkpoints, logging, the trainer loop.
