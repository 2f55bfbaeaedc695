#pragma once
#include "kiln/tensor.h"
