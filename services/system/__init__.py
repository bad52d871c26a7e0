"""The system service: aggregated health, deployment facts, and the answer for unbuilt sections."""
