"""Speculative decoding: proposals of the next few tokens, checked in one step of the model."""
