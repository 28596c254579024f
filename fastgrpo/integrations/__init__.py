"""Integrations with other training libraries. Each submodule imports its library lazily (optional deps).

* :mod:`fastgrpo.integrations.trl` — TRL's ``GRPOTrainer`` computing its loss with :func:`fastgrpo.grpo_loss`.
"""
