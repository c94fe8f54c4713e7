"""Feedback-guided synthesis: criteria, the guided DDIM loop, generators, quotas, Ray Data."""
