"""The built-in plugin: ``ce``, ``kd``, ``rkd``, the divergences ``kl`` and ``rkl``, the
transforms ``temperature`` and ``label_smoothing``, the schedulers ``fixed``, ``linear``
and ``warmup``, the ``mlp`` backbone and the datasets ``gaussian_mixture``, ``tensors``,
``csv`` and ``hf_disk``; registered by :mod:`kdcore.builtin.plugin` through the same hooks
as any other plugin, and loaded by module name like an entry point.

Layer 3: imports :mod:`kdcore.common`, :mod:`kdcore.plugins`, :mod:`kdcore.losses` and
:mod:`kdcore.data`, as a third-party plugin would.
"""
