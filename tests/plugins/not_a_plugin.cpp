// An ordinary shared library with no ptqlab entry points.
extern "C" int some_function() { return 42; }
