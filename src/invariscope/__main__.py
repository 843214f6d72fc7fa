from invariscope.cli import main

main()
