"""Statistics shared by every stage that judges a model: the vectorised (patient-cluster) bootstrap.

A base layer (it imports nothing from ``pipeline``): training uses it for the semi-supervised harm guard,
evaluation for every interval, operations for champion/challenger decisions.
"""
