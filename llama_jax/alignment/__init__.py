"""Post-training after SFT, as Llama 2 did it: preference data, reward models, DPO (this package's offline half)."""
