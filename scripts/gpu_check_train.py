"""`occ_exp.train` with deterministic kernels, for the GPU check's save / resume part (c).

    torchrun --standalone --nproc_per_node=1 scripts/gpu_check_train.py [hydra overrides]

A bit-exact resume can only be told apart from run-to-run noise when two uninterrupted runs agree
bit for bit, so this entry point asks torch for deterministic kernels (warn only where an op has
none; the caller sets CUBLAS_WORKSPACE_CONFIG=:4096:8 before CUDA starts). Everything else is
`python -m occ_exp.train`. The work stays under `__main__`: the verifier's forkserver re-imports
this module in its workers.
"""

if __name__ == "__main__":
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)

    from occ_exp.train import main

    main()
