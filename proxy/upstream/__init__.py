"""Upstream side: per-gateway runtime state, health sources, limits and the balancer."""
