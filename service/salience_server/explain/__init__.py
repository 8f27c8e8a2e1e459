"""Explanation methods: what to explain (options), where the score comes from
(targets), how the gradient becomes a map (modifiers), and one module per method.
"""
