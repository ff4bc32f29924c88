"""What goes live: the promotion gate, fusion weights tuned on rewards, and off-policy estimates of a weighting."""
