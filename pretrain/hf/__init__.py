"""The Hugging Face boundary: conversion both ways and the one name map (convert.py), the export with its parity
check (export.py), the model card (card.py), and the output directories the project may replace (outputs.py)."""
