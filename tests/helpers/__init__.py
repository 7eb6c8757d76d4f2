"""What the tests share: tiny checkpoints (tiny_models), the memorized model (memorized), tokenizer
directories (tokenizer_fixtures), a live server and reference answers (server_harness), distributed
launches (launch) and the scripts their ranks run (distributed_worker, distributed_api_worker)."""
