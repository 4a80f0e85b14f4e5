"""gpt2x's Hydra launcher plugins (Hydra instantiates launchers only from `hydra_plugins.*`).

No `hydra_plugins/__init__.py` on purpose: `hydra_plugins` is a namespace package shared with
the installed plugins (joblib, submitit, optuna); an __init__ here would hide them.
"""
