"""beamline-inn's library: SAXS frames to posterior samples, importable without Prefect.

Subpackages: :mod:`pipeline.physics` (forward model, prior, simulator), :mod:`pipeline.model`
(cINN, training, model files), :mod:`pipeline.integration` (pyFAI), :mod:`pipeline.sources`
(where exposures come from), :mod:`pipeline.transport` (wire format, endpoints),
:mod:`pipeline.store` (HDF5 results), and :mod:`pipeline.config` (the run configuration).
"""
