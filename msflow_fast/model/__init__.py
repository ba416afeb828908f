"""msflow_fast.model"""
