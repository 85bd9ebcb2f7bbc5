"""Model monitoring on the device: drift, field accuracy from ground truth, shadow runs."""
