"""Training for `dalle`: the dVAE (:mod:`dalle.train.dvae`), the transformer (:mod:`dalle.train.transformer`)
and what they share (:mod:`dalle.train.common`: checkpoints, EMA, schedules, torchrun support, model dirs).

Submodules are imported by name (``from dalle.train.dvae import train_dvae``) so that importing this package
stays cheap.
"""
