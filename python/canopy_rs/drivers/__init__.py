"""The drivers: the loops that walk a model's canopy through a backend, below the public entry points
(:mod:`canopy_rs.api`'s ``exact`` and ``bounded``, :mod:`canopy_rs.sampling`'s ``sample``, the estimators).

* :mod:`~canopy_rs.drivers.setup`: argument checks, policy, backend, batch size, counters;
* :mod:`~canopy_rs.drivers.canopy`: the canopy loop (:class:`~canopy_rs.drivers.canopy.TreeRun`) and
  :class:`~canopy_rs.drivers.canopy.Budget`;
* :mod:`~canopy_rs.drivers.rollouts`: the rollout loop (:func:`~canopy_rs.drivers.rollouts.run_rollouts`);
* :mod:`~canopy_rs.drivers.size_probe`: a canopy's size, estimated from a few rollouts before enumerating it;
* :mod:`~canopy_rs.drivers.shards`: one canopy split into a head and subtree shards whose partial sums merge
  into the same result; :mod:`~canopy_rs.drivers.ray_canopy` runs the shards on Ray actors;
* :mod:`~canopy_rs.drivers.prompts`: many prompts of one named model, locally or on Ray
  (:func:`~canopy_rs.drivers.prompts.map_prompts`); :mod:`~canopy_rs.drivers.ray_pool` is the one Ray executor;
* :mod:`~canopy_rs.drivers.progress`: the progress bar.
"""
