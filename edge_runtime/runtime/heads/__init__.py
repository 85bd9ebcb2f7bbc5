"""Decoders for detection and segmentation heads: anchors, box decode, NMS, masks."""
