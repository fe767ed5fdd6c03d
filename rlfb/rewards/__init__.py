"""rlfb.rewards"""
