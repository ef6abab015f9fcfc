"""Partner side: the ClientApp (local DP-SGD training and evaluation)."""
