"""fleetcast: multicast deployment of golden disk images to labs of identical PCs."""

__version__ = "0.1.0"
