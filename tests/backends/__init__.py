"""Real backends started by the tests: SoftHSM2 tokens, software TPMs, OpenBao servers."""
