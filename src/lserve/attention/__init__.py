"""Attention backends behind one interface: plan once per step, run per layer."""
