"""Avalanche side of net2grow: growth plugins, policies, strategies and metrics."""
