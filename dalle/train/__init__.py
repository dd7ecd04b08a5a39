"""Training for `dalle`: the dVAE (:mod:`dalle.train.dvae`), the transformer (:mod:`dalle.train.transformer`)
and what they share: :mod:`~dalle.train.loop` (the loop), :mod:`~dalle.train.checkpoints`,
:mod:`~dalle.train.ema`, :mod:`~dalle.train.schedules`, :mod:`~dalle.train.distributed` (torchrun),
:mod:`~dalle.train.outputs` and :mod:`~dalle.train.exports` (model directories).

Submodules are imported by name (``from dalle.train.dvae import train_dvae``) so that importing this package
stays cheap.
"""
