from turbine.cli import main

main()
