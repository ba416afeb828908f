"""msflow_fast.nn"""
