from anondrop.cli import main

main()
