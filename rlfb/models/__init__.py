"""rlfb.models"""
