"""selfrepair"""
