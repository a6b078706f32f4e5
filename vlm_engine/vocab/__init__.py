"""The engine's vocabulary: value types every layer imports downward into.

A request and its images (`request`), the shapes images take in a prompt (`inputs`), what the
scheduler hands the runner each step (`scheduler_output`), and what crosses between the frontend
and the engine core (`protocol`). These modules import nothing heavier than the sampling
parameters, so the frontend, the scheduler, the runtime and the core process all share them
without loading each other.
"""
