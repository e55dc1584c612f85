"""Everything a ClientApp process imports: node identity and data, local training, the reply, the mods."""
