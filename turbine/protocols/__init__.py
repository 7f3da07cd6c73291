"""Wire messages shared between Turbine's subsystems (msgspec Structs, defaults on new fields)."""
