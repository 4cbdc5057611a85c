"""Runtime: loading compiled steps and running them (functional engine + torch.optim front end)."""
