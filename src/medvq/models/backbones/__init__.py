"""Pretrained networks shared by several methods: EfficientNet-Lite0 and its one ImageNet weight loader."""
