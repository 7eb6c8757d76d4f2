"""Off-Mac verification of the Metal kernels: runner.py captures the source MLX generates and runs
it on the CPU against metal_shim.h, numeric.py holds float64 answers and tolerances, verify.py the
test matrix (`python -m mlx_mixtral.metal.emulator.verify`)."""
