"""Benchmarks of DES-SAM's CPU cost, run from the repository root (not part of the installed
package; ``dessam_d2`` never imports them):

    python -m benchmarks.run       # encoder, training step, inference, decoder (ViT-B)
    python -m benchmarks.peers     # the tools users would pick instead, in their own venv
    python -m benchmarks.slides    # peak memory of whole-slide prediction; --writer-only

Modules: ``measure`` (model, input and timing helpers), ``phases`` (the measured phases, each a
function that returns its figures), ``run`` (the driver: each phase in a fresh process, then the
figures and their ratios), ``report`` (the driver's printed summary), ``peers`` (the peers'
driver, main venv) and ``peers_worker`` (one peer in the peers' venv: numpy, torch and that
peer only), ``slides``. The results are in docs/PERFORMANCE.md.
"""
