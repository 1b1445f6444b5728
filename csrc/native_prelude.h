#include "fastcdc.h"
#include "walk.h"
