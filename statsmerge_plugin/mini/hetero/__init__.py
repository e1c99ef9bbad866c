"""The mixed-architecture mini benchmark (``mini-clip_TA8_hetero``): the base build with two tasks
served by teachers of another architecture.

:mod:`.build` (the cached, atomic teachers' build and the pool's ``load_teacher``) and
:mod:`.compare` (distil + StatsMerging vs simple average / task arithmetic / TIES on the same
students). The heterogeneous *method* is :mod:`statsmerge_plugin.method.statsmerging.hetero`.
"""
