"""Cluster deployment: the only package that imports ray."""
