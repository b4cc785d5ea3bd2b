"""The benchmark behind `nitro-torch bench` and scripts/bench.py: nitro_torch against the HF baselines in-process
(main.py, systems.py), or a running server over HTTP (`--url`: http_system.py, http_client.py)."""
