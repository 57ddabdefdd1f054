"""Warms math-verify and sympy in the verifier's forkserver.

Imported only by the forkserver that :class:`occ_exp.reward.pool.WorkerPool` starts (through
``set_forkserver_preload``); importing it runs one check of every kind once
(:meth:`Engine.warm_up`), so every worker forked from that server inherits the loaded
sub-packages, compiled regexes and parser tables and is ready in a fraction of a second
instead of ~2 CPU seconds.  That matters when a stuck worker is replaced in the middle of a
batch on a busy machine.  Workers still run their own (then nearly free) warm-up, which covers
``spawn`` and a forkserver started earlier by other code.
"""

from occ_exp.reward.engine import Engine

Engine().warm_up()
