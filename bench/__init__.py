"""Benchmarks: payswitch measured side by side with the anchors of shared/ANCHORS.md."""
