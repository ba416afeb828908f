"""msflow_fast.engine"""
