"""Research tools: sweeps over trellis specs (distortion, real-weight error, kernel speed)."""
