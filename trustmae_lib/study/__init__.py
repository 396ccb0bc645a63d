"""Study: sweeps of runs, result tables and claims, the paper's reference tables, figures.

Imports ``engine`` (and below); nothing imports it but the command line and the notebooks.
"""
