"""Operator tools: the fleet client and staged rollouts."""
