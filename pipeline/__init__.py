"""beamline-inn's library: SAXS frames to posterior samples, importable without Prefect.

Subpackages: :mod:`pipeline.physics` (forward model, prior, simulator), :mod:`pipeline.model`
(cINN, training, model files), :mod:`pipeline.integration` (pyFAI), :mod:`pipeline.sources`
(where exposures come from), :mod:`pipeline.transport` (wire format, endpoints),
:mod:`pipeline.store` (HDF5 results), and :mod:`pipeline.config` (the run configuration).

Importing it sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it: by default the
OpenMP threads of pyFAI's integration spin while they wait for the next frame, taking the
cores the inference workers need (child processes inherit the setting). Measured with
``benchmarks/pipeline.py``, Pilatus 1M frames on 2 cores: 44-50 exposures/s spinning, 100-108
passive, the bare pyFAI loop unchanged (149-161 against 155-161 frames/s). It takes effect
only when set before the OpenMP runtime starts, that is, before pyFAI or torch are imported:
set it in the environment where another program imports them first.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
